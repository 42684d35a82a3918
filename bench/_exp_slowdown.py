import sys, statistics, torch
sys.path.insert(0, 'bench')
import gpu_copy as g
B, C, S = 64, 2048, 40
weights, kv_cache, x = g._decode_model(B, C)
caches = [torch.randn(2, 1024, g.BLOCK, g.KV_HEADS, g.HEAD_DIM, dtype=torch.bfloat16, device="cuda") for _ in range(g.LAYERS)]
nb = 512
ids = torch.randperm(1024)[:nb].cuda()
shape = (2, nb, g.BLOCK, g.KV_HEADS, g.HEAD_DIM)
per = 2 * nb * g.BLOCK * g.KV_HEADS * g.HEAD_DIM
staging = torch.empty(g.LAYERS, per, dtype=torch.bfloat16, device="cuda")
host = torch.empty(g.LAYERS, per, dtype=torch.bfloat16, pin_memory=True)
compute = torch.cuda.Stream(priority=-1)
side = torch.cuda.Stream(priority=0)
def gather(lo=0, hi=g.LAYERS):
    for l in range(lo, hi):
        torch.index_select(caches[l], 1, ids, out=staging[l].view(shape))
def d2h(lo=0, hi=g.LAYERS):
    for l in range(lo, hi):
        host[l].copy_(staging[l], non_blocking=True)
def both(lo=0, hi=g.LAYERS):
    for l in range(lo, hi):
        torch.index_select(caches[l], 1, ids, out=staging[l].view(shape))
        host[l].copy_(staging[l], non_blocking=True)
def d2h_direct(lo=0, hi=g.LAYERS):
    # no gather kernel: one copy per contiguous run of blocks (here: per block) per K/V
    for l in range(lo, hi):
        hv = host[l].view(shape)
        for j, b in enumerate(idl[:64]):
            hv[:, j].copy_(caches[l][:, b], non_blocking=True)
idl = ids.tolist()
modes = {"gather": gather, "d2h": d2h, "both": both}
def run(fn, spread):
    torch.cuda.synchronize()
    e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    y = x
    with torch.cuda.stream(compute):
        e0.record()
        for i in range(S):
            y = g._decode_step(weights, kv_cache, y)
            if fn is not None:
                if spread == 0 and i == 0:
                    side.wait_stream(compute)
                    with torch.cuda.stream(side):
                        fn()
                elif spread > 0 and i < spread:
                    # one slice of layers per step, started when that step is done
                    per_step = g.LAYERS // spread
                    side.wait_stream(compute)
                    with torch.cuda.stream(side):
                        fn(i * per_step, (i + 1) * per_step)
        e1.record()
    torch.cuda.synchronize()
    return e0.elapsed_time(e1)
for _ in range(2):
    run(None, 0)
    for f in modes.values():
        run(f, 0)
res = {}
for _ in range(15):
    res.setdefault("none", []).append(run(None, 0))
    for n, f in modes.items():
        for spread in (0, 32):
            res.setdefault((n, spread), []).append(run(f, spread))
base = statistics.median(res["none"])
print("none all", sorted(round(v,1) for v in res["none"]))
print(f"none {base:.2f} ms for {S} steps ({base/S:.2f} ms/step)")
for k, v in res.items():
    if k == "none": continue
    m = statistics.median(v)
    print(k, f"{m:.2f} ms  +{m-base:.2f} ms  {m/base-1:+.2%}", "min", round(min(v),1), "max", round(max(v),1))

"""Code that vLLM loads into its own processes through its public plugin points.

- `plugin.register` is the `vllm.general_plugins` entry point (runs in every vLLM process);
- `worker.SlofleetWorkerExtension` is passed as `--worker-extension-cls` and adds methods to each
  worker that the sidecar calls through the engine's `/collective_rpc` (dev mode);
- the KV connector (`--kv-transfer-config` with `kv_connector_module_path`) joins them for
  migration.

This is the only place in the project that imports vLLM: it runs pinned to one vLLM series and
must never be imported by the sidecar runtime itself.
"""

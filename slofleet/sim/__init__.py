"""`slofleet simulate`: a discrete-event simulator of a fleet of LLM engine instances.

It replays a request trace (plus a synthetic batch workload) through the same policy functions the
operator, the gateway and the sidecars run (global and local autoscalers, dispatch, preemption),
against an instance model calibrated from engine costs (`slofleet.calibration`). Pure Python, no
I/O except reading traces and writing reports.
"""

"""The request path: an OpenAI-compatible gateway in front of a fleet of vLLM instances.

It classifies each request (interactive or batch, with a priority), dispatches it with the shared
dispatch policy from the instances' live load, keeps the durable batch queue, and relays token
streams so that a stream survives the loss (or the move) of its instance. See DESIGN.md section 2.
"""

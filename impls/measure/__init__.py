"""The one measurement core: FLOPs (counted and analytic), peak FLOP/s, exact memory."""
from .flops import count_flops, model_flops_per_step, model_flops_per_token
from .memory import PeakMemory, SavedActivations, model_state_bytes, process_peak_rss, tensor_bytes
from .peak import device_name, peak_flops

__all__ = ["PeakMemory", "SavedActivations", "count_flops", "device_name", "model_flops_per_step",
           "model_flops_per_token", "model_state_bytes", "peak_flops", "process_peak_rss", "tensor_bytes"]

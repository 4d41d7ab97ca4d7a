"""DeepSpeed's ZeRO memory estimators (only musiclm/train/ imports deepspeed; bench/scaling uses these)."""

from __future__ import annotations


def zero_estimators():
    """DeepSpeed's estimator functions, or the same formulas when deepspeed cannot be imported."""
    try:
        from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs as z3
        from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs as z2

        return z2, z3, "deepspeed"
    except Exception:  # pragma: no cover - deepspeed is a dependency; keep the doc buildable anyway

        def z2(total_params, num_gpus_per_node=1, num_nodes=1, cpu_offload=True, additional_buffer_factor=1.5):
            n = num_nodes * num_gpus_per_node
            if cpu_offload:
                return int(total_params * max(4 * n, 16) * additional_buffer_factor), int(2 * total_params)
            return (
                int(total_params * 4 * num_gpus_per_node * additional_buffer_factor),
                int(2 * total_params + int(18 * total_params / n)),
            )

        def z3(
            total_params,
            largest_layer_params,
            num_gpus_per_node=1,
            num_nodes=1,
            cpu_offload=True,
            cpu_offload_params=True,
            zero_init=True,
            additional_buffer_factor=1.5,
        ):
            n, big = num_nodes * num_gpus_per_node, 4 * largest_layer_params
            if cpu_offload and cpu_offload_params:
                return int(total_params * 18 / num_nodes * additional_buffer_factor), int(big), big
            return (
                int(largest_layer_params * 4 * num_gpus_per_node * additional_buffer_factor),
                int(big + int(18 * total_params / n)),
                big,
            )

        return z2, z3, "formula (deepspeed not importable)"

"""Optional integrations with training frameworks.

Each integration lives in its own submodule and imports its framework only when that submodule is imported:
`import focal_kernels` never imports TRL, transformers or PEFT.

- `focal_kernels.integrations.trl`: `FocalPOConfig` and `FocalPOTrainer`, a drop-in for TRL's `DPOTrainer`.
"""

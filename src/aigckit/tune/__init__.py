"""Optimising generated content: LoRA fine-tuning (SFT), preference optimisation (DPO), RL (GRPO/RLOO) on CPU."""

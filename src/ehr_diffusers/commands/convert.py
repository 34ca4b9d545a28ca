"""``convert-ehrxdiff``: the released EHRXDiff weights (arXiv 2409.07012, github dek924/EHRXDiff, Hub
dek924/ehrxdiff) -> an ``EHRXDiffPipeline`` folder."""

from __future__ import annotations

import argparse

# what each group of original keys became, for the summary
_GROUPS = (("unet", "model.diffusion_model.*"), ("ema", "model_ema.*"), ("vae", "first_stage_model.*"),
           ("vae_copy", "cond_stage_model.autoencoder.*"), ("image_encoder", "cond_stage_model.clip_img_encoder.*"),
           ("event_encoder", "cond_stage_model.clip_tab_encoder.*"),
           ("fusion_adapter", "cond_stage_model.vae_projector/adaptor.*"), ("schedule", "schedule buffers"))


def run_convert_ehrxdiff(args: argparse.Namespace) -> None:
    """Converts ``args.checkpoint`` with ``args.config`` into ``args.out`` (``args.ema``: the UNet's EMA weights;
    ``args.overwrite``: replace an earlier output) and prints what was mapped and checked."""
    from ..pipelines.convert_ehrxdiff import convert_ehrxdiff_checkpoint

    converted = convert_ehrxdiff_checkpoint(args.checkpoint, args.config, args.out, use_ema=args.ema,
                                            overwrite=args.overwrite)
    weights = "EMA" if converted.use_ema else "training"
    print(f"EHRXDiff pipeline written to {args.out} (conditioning: {converted.conditioning}, UNet: {weights} "
          f"weights, {sum(converted.key_counts.values()):,} original keys accounted for)")
    for name, component in converted.components.items():
        if hasattr(component, "parameters"):
            count = sum(parameter.numel() for parameter in component.parameters())
            print(f"  {name}: {type(component).__name__}, {count / 1e6:,.2f} M parameters")
        else:
            print(f"  {name}: {type(component).__name__}")
    used = {"unet": not converted.use_ema, "ema": converted.use_ema}
    print("  original keys: " + ", ".join(
        f"{label} {converted.key_counts[name]:,}" + ("" if used.get(name, True) else " (not used)")
        for name, label in _GROUPS if name in converted.key_counts))
    for check in converted.checks:
        print(f"  checked: {check}")

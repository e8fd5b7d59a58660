"""The `flux2` command: a thin click wrapper over the Python API. Heavy imports happen inside commands."""

from __future__ import annotations

import click

from . import __version__
from .config import MODELS


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="flux2")
def main():
    """FLUX.2 image generation and editing on MLX."""


@main.command()
def models():
    """List the FLUX.2 variants with their default steps, guidance and weights."""
    for spec in MODELS.values():
        how = {"embedded": "embedded guidance", "none": "no guidance", "cfg": "true CFG"}[spec.guidance_mode]
        click.echo(f"{spec.name:14} {spec.default_steps:>2} steps, guidance {spec.default_guidance:g} "
                   f"({how})  {spec.repo_id}/{spec.transformer_file}")

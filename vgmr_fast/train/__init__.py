"""``vgmr-fast train``: train backbones with VGMR and the balancing methods, then run the analyses.

Grid: ``settings`` (benchmark presets, e.g. ``clean`` and ``noisy``) ×
``backbones`` (``concat``, ``transformer``) × ``methods`` × ``seeds``.
A method is ``none`` (the bare backbone, the paper's "Concat"), or ``+``-joined
parts: at most one refiner (``vgmr``; ``vgmr@RHO`` / ``vgmr%K``: VGMR with
value fraction RHO / value supervision every K-th step, e.g. ``vgmr@0.25``,
``vgmr%4``; the Table 7 comparison refiners ``mlp``, ``gate``,
``cross_attention``) and at most one balancer (``ogm``: OGM-GE;
``iibalance``; ``decision``: the adaptive decision-layer allocation head).
``vgmr+ogm`` is the paper's Table 4.6 combination. ``iibalance`` and
``decision`` replace the backbone's head, so they are not combined with
``vgmr`` (whose value targets come from the backbone's own head, docs/math.md §6).

Per run: AdamW, the best-validation-accuracy checkpoint is restored (the
paper's protocol) and evaluated on test: accuracy, macro-F1, modality removal
(Table 4.7), noise-robustness sweeps over ratio and weight (§4.8), the
gradient cosine between the first modality alone and all modalities over
training (§4.9). For the first seed: VGMR value/gate statistics clean vs. 30 %
of the dominant modality's steps replaced by noise (Table 4.4), the
refinement-difference heatmap (§4.10), decision-layer diagnostics of the
concat models against unimodally trained concat models (seed 000).

VGMR is the fused module ``vgmr_fast.VGMR`` (``--backend``, default
``auto``: the best fused backend for the device, the reference where none is
built) with its default dropout stream, the shared Philox stream, so this
command runs what users run. It trains with the docs/math.md §6 objective;
``--value-fraction`` and ``--value-every`` make its value supervision cheaper
(see ``vgmr_fast.objective``).

Under ``torchrun`` (``WORLD_SIZE`` > 1) every process takes its slice of each
batch, gradients are averaged over processes before each optimiser step (gloo,
or NCCL for CUDA), and rank 0 alone writes the outputs.

Outputs in ``--out``: ``results.md``, ``results.json`` and PNG plots.

Modules, each importing only those after it: ``cli`` (options, entry points), ``grid`` (the
method × seed grid, analyses, summaries, plots), ``report`` (the markdown writer), ``probes``
(linear probes and their summaries), ``loop`` (model, optimiser, training step and epochs),
``distributed`` (``torchrun``: process group, slices, gradient average), ``methods`` (what a
method names), ``stats`` (mean ± std over seeds and the verdict rule). ``ablate``
(``python -m vgmr_fast.train.ablate``) runs the balancing ablations on ``loop`` and ``cli``.
"""
from .cli import add_train_arguments, main, run_train
from .grid import train_grid
from .loop import build_model, make_optimizer, train_one
from .methods import parse_method

__all__ = ["add_train_arguments", "run_train", "train_grid", "parse_method", "build_model", "make_optimizer",
           "train_one", "main"]

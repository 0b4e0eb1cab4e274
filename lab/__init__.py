"""The mini safety lab (docs/LAB.md): lab-only code, kept out of the core `safedata` package.

The lab is an application of the tool, not part of it: it measures what fine-tuning on a selection does to the
project's own tiny aligned model (ft_datasets/lab/). A user who ranks a real pool installs and reads `safedata`;
the lab's metrics (a compliance detector for the lab's placeholder answers, its tables and plots) mean nothing
outside the lab data, so they live here, next to the scripts that run the lab (scripts/demo.sh,
scripts/lab_methods.sh, lab_report.py), and import `safedata` like any other user of it.

- lab/demo_metrics.py: metrics of a lab model, random subsets, collecting a run, the orderings checked;
- lab/demo_report.py: the demo's table, plots and results.json;
- lab/methods.py: the every-method benchmark's table (mean, sd, 95% interval, per seed, selection cost) and plot;
- lab/defence.py: the lab defence (docs/AUDIT.md): mixes, and the table and plot of audited vs random drops;
- lab/real/: the same study on a real chat model (docs/REAL_MODEL.md): the alignment data and gates of
  SmolLM2-135M-Instruct, its committed LoRA adapter (lab/smollm2_aligned/), and the experiment's report.
"""

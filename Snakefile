# dpelt: the ELT loop (Exploration, Labeling, Training) as file-producing rules.
#
#   snakemake --cores all                      the run of config/config.yaml
#   snakemake --cores all --configfile X.yaml  another run
#   snakemake -n                               what would run (the loop grows as iterations finish)
#
# One iteration NNN as files (rules in rules/*.smk, helpers in rules/common.smk):
#   data/init/frames.nc                  init      labelled initial data (DP-GEN init_bulk)
#   data/holdout/frames.nc               holdout   oracle MD frames never used by the loop
#   iter/NNN/train/K/model.pt            train     ensemble member K (+ lcurve.csv, input.json)
#   iter/NNN/explore/TASK/frames.nc      explore   MD frames + model deviations (+ md.log)
#   iter/NNN/select/report.json          select    accurate/candidate/failed, converged (checkpoint)
#   iter/NNN/label/frames.nc             label     oracle labels of the candidates (protected)
#   iter/NNN/eval/metrics.json           evaluate  held-out errors of the ensemble
#   reports/summary.json                 report    the run at a glance (+ iterations.csv, plots)

from snakemake.utils import min_version

min_version("9.0")


# The default run unless config files come from the command line (--configfile X.yaml, which
# must then be complete: an empty or partial file is an error, never silently the default run);
# `--config key=value` alone still starts from the default.
if not workflow.overwrite_configfiles:

    configfile: "config/config.yaml"


report: "rules/report.rst"


include: "rules/common.smk"
include: "rules/init.smk"
include: "rules/train.smk"
include: "rules/explore.smk"
include: "rules/select.smk"
include: "rules/label.smk"
include: "rules/evaluate.smk"
include: "rules/report.smk"


# Cheap steps the scheduler (SLURM) would only make wait in a queue: the select checkpoint that
# decides the next iteration, and the report.
localrules:
    select,
    report,


rule all:
    """The whole run: every iteration until the last exploration stage converges, and the report."""
    input:
        "reports/summary.json",


onsuccess:
    publish_finished_run()

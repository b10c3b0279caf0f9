rule init:
    """Labelled initial data, like DP-GEN init_bulk: structures scaled, perturbed and run through a
    short oracle MD; imported data added (deepmd/npy, extxyz, .nc)."""
    output:
        frames="data/init/frames.nc",
        summary="data/init/frames.json",
    params:
        spec=spec_json({"type_map": config["type_map"], "init": config["init"], "label": oracle_label_spec()}),
        seed=derive_seed(SEED, "init"),
        threads=THREADS["label"],
    log:
        "logs/init.log",
    benchmark:
        "benchmarks/init.tsv"
    threads: THREADS["label"]
    resources:
        label_timeout=LABEL_TIMEOUT,
    shell:
        "dpelt init --spec {params.spec:q} -o {output.frames} --workdir work/init --seed {params.seed} --threads {params.threads} --timeout {resources.label_timeout} > {log} 2>&1"


rule holdout:
    """Held-out frames: oracle MD from every explored system at every explored temperature; never
    used by the loop, only to judge each iteration's ensemble."""
    output:
        frames="data/holdout/frames.nc",
        summary="data/holdout/frames.json",
    params:
        spec=holdout_spec(),
        seed=derive_seed(SEED, "holdout"),
        threads=THREADS["label"],
    log:
        "logs/holdout.log",
    benchmark:
        "benchmarks/holdout.tsv"
    threads: THREADS["label"]
    resources:
        label_timeout=LABEL_TIMEOUT,
    shell:
        "dpelt holdout --spec {params.spec:q} -o {output.frames} --workdir work/holdout --seed {params.seed} --threads {params.threads} --timeout {resources.label_timeout} > {log} 2>&1"

rule train:
    """Train ensemble member {k} of iteration {i} on the initial data and every earlier iteration's
    labels (a DeePMD-kit input; the member's seed is derived from the run's seed)."""
    input:
        init=ancient(INIT),
        labels=labels_before,
        warm=warm_start_model,
    output:
        model="iter/{i}/train/{k}/model.pt",
        lcurve="iter/{i}/train/{k}/lcurve.csv",
        resolved="iter/{i}/train/{k}/input.json",
    params:
        spec=spec_json(train_input(config)),
        seed=train_seed,
        warm=warm_start_args,
        threads=THREADS["train"],
    log:
        "logs/train/{i}_{k}.log",
    benchmark:
        "benchmarks/train/{i}_{k}.tsv"
    threads: THREADS["train"]
    shell:
        "dpelt train --spec {params.spec:q} --systems {input.init} {input.labels} -o iter/{wildcards.i}/train/{wildcards.k} "
        "--seed {params.seed} --threads {params.threads} {params.warm} --resume > {log} 2>&1"

rule evaluate:
    """Errors of iteration {i}'s ensemble (each member and the mean) on the held-out frames, per
    composition x temperature cell; and its calibration: the max force deviation against the
    true force error on the frames iteration {i} labelled."""
    input:
        models=models_of,
        holdout=holdout_input,
        labelled="iter/{i}/label/frames.nc",
    output:
        metrics="iter/{i}/eval/metrics.json",
        parity="iter/{i}/eval/parity.png",
        calibration="iter/{i}/eval/calibration.json",
    params:
        threads=THREADS["evaluate"],
    log:
        "logs/evaluate/{i}.log",
    benchmark:
        "benchmarks/evaluate/{i}.tsv"
    threads: THREADS["evaluate"]
    shell:
        "dpelt evaluate -m {input.models} -s {input.holdout} -o {output.metrics} --plot {output.parity} "
        "--labelled {input.labelled} --calibration {output.calibration} --threads {params.threads} > {log} 2>&1"

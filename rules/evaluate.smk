rule evaluate:
    """Errors of iteration {i}'s ensemble (each member and the mean) on the held-out frames."""
    input:
        models=models_of,
        holdout=holdout_input,
    output:
        metrics="iter/{i}/eval/metrics.json",
        parity="iter/{i}/eval/parity.png",
    params:
        threads=THREADS["evaluate"],
    log:
        "logs/evaluate/{i}.log",
    benchmark:
        "benchmarks/evaluate/{i}.tsv"
    threads: THREADS["evaluate"]
    shell:
        "dpelt evaluate -m {input.models} -s {input.holdout} -o {output.metrics} --plot {output.parity} "
        "--threads {params.threads} > {log} 2>&1"

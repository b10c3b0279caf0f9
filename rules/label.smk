rule label:
    """Label iteration {i}'s candidates with the oracle; failed labels are quarantined with their
    reason in failures.json; frames labelled before are reused, never recomputed."""
    input:
        candidates="iter/{i}/select/candidates.nc",
        known=known_labels,
    output:
        frames=protected("iter/{i}/label/frames.nc"),
        failures="iter/{i}/label/failures.json",
        summary="iter/{i}/label/summary.json",
    params:
        oracle=config["label"]["oracle"]["name"],
        kwargs=spec_json(config["label"]["oracle"]["kwargs"]),
        max_failed=config["label"]["max_failed_ratio"],
        max_force=config["label"]["max_force"],
        threads=THREADS["label"],
        retry=retry_failed_labels,
    log:
        "logs/label/{i}.log",
    benchmark:
        "benchmarks/label/{i}.tsv"
    threads: THREADS["label"]
    resources:
        label_attempt=label_attempt,
        label_timeout=LABEL_TIMEOUT,
    shell:
        "OMP_NUM_THREADS={params.threads} dpelt label {input.candidates} -o iter/{wildcards.i}/label --oracle {params.oracle} "
        "--oracle-kwargs {params.kwargs:q} --max-failed-ratio {params.max_failed} --max-force {params.max_force} "
        "--known {input.known} {params.retry} --timeout {resources.label_timeout} > {log} 2>&1"

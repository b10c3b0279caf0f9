if not config["explore"]["batched"]:

    rule explore:
        """MD task {task} of iteration {i} driven by the ensemble: frames and model deviations every
        trj_freq steps, cut at the first blow-up (DP-GEN model_devi)."""
        input:
            models=models_of,
            start=ancient(INIT),
            earlier=earlier_select_reports,
        output:
            frames="iter/{i}/explore/{task}/frames.nc",
            summary="iter/{i}/explore/{task}/md.json",
            mdlog="iter/{i}/explore/{task}/md.log",
        params:
            spec=explore_spec,
            system=explore_system,
            seed=explore_seed,
            threads=THREADS["explore"],
        log:
            "logs/explore/{i}_{task}.log",
        benchmark:
            "benchmarks/explore/{i}_{task}.tsv"
        threads: THREADS["explore"]
        shell:
            "dpelt explore -m {input.models} --start {input.start} --system {params.system} --spec {params.spec:q} "
            "-o iter/{wildcards.i}/explore/{wildcards.task} --name {wildcards.task} --seed {params.seed} "
            "--iteration {wildcards.i} --threads {params.threads} > {log} 2>&1"

else:

    checkpoint explore_batch:
        """Every MD task of iteration {i} in one process (explore.batched: true): the walkers advance
        in lockstep with one batched ensemble evaluation per step. Writes each task's
        iter/{i}/explore/TASK/{frames.nc,md.json,md.log} (atomically, the same files as rule explore
        would), then batch.json. A checkpoint: select's inputs, the task files, exist once it ran."""
        input:
            models=models_of,
            start=ancient(INIT),
            earlier=earlier_select_reports,
        output:
            manifest="iter/{i}/explore/batch.json",
        params:
            tasks=explore_batch_tasks,
            threads=THREADS["explore"],
        log:
            "logs/explore/{i}_batch.log",
        benchmark:
            "benchmarks/explore/{i}_batch.tsv"
        threads: THREADS["explore"]
        shell:
            "dpelt explore-batch -m {input.models} --start {input.start} --tasks {params.tasks:q} "
            "-o iter/{wildcards.i}/explore --iteration {wildcards.i} --threads {params.threads} > {log} 2>&1"

checkpoint select:
    """Classify iteration {i}'s explored frames by force deviation (accurate < trust_lo <= candidate <
    trust_hi <= failed), pick at most max_labels candidates, decide convergence. The loop reads
    report.json to choose the next iteration's stage."""
    input:
        frames=explore_outputs,
        known=known_labels,
        earlier=earlier_select_reports,
        # farthest-point spreading measures frames with the descriptor of the iteration's model 0
        model=fps_model,
    output:
        candidates="iter/{i}/select/candidates.nc",
        report="iter/{i}/select/report.json",
    params:
        trust=select_trust_args,
        virial=(
            f"--v-trust-lo {config['select']['v_trust_lo']} --v-trust-hi {config['select']['v_trust_hi']}"
            if config["select"]["v_trust_lo"] is not None
            else ""
        ),
        adapt=(
            f"--adapt-numb-candi {config['select']['adapt_numb_candi']} --adapt-perc-candi {config['select']['adapt_perc_candi']}"
            if config["select"]["adapt_numb_candi"] is not None
            else ""
        ),
        max_labels=config["select"]["max_labels"],
        spread=config["select"]["spread"],
        model=lambda wc, input: f"-m {input.model}" if input.model else "",
        conv=config["select"]["conv_accuracy"],
        seed=select_seed,
        threads=THREADS["evaluate"],
    log:
        "logs/select/{i}.log",
    benchmark:
        "benchmarks/select/{i}.tsv"
    threads: THREADS["evaluate"]
    shell:
        "dpelt select {input.frames} -o iter/{wildcards.i}/select {params.trust} {params.virial} {params.adapt} "
        "--max-labels {params.max_labels} --spread {params.spread} {params.model} --conv-accuracy {params.conv} --seed {params.seed} "
        "--iteration {wildcards.i} --labelled {input.known} --threads {params.threads} > {log} 2>&1"

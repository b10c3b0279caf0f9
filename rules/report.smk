rule report:
    """The run's reports: summary.json, iterations.csv and plots (ratios per iteration and stage,
    deviation histograms with the trust levels, learning curves, held-out parity, and per iteration the
    max force deviation against the true error of the frames it labelled)."""
    input:
        report_inputs,
    output:
        summary="reports/summary.json",
        table="reports/iterations.csv",
        ratios=report("reports/ratios.png", category="Selection", caption="report.rst"),
        deviation=report("reports/deviation.png", category="Exploration", caption="report.rst"),
        lcurve=report("reports/lcurve.png", category="Training", caption="report.rst"),
        parity=report("reports/parity.png", category="Accuracy", caption="report.rst"),
        calibration=report("reports/calibration.png", category="Accuracy", caption="report.rst"),
    params:
        args=report_args,
    log:
        "logs/report.log",
    benchmark:
        "benchmarks/report.tsv"
    shell:
        "dpelt report {params.args} -o reports > {log} 2>&1"

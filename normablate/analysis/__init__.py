"""Statistics, tables and plot helpers shared by ``sweep/``, ``studies/`` and ``report/`` (imports none of them).

    stats.py   mean ± 95% CI over seeds, Student's t without scipy, Welch's test of a difference
    data.py    StudyData: a study's counted trials as one table (+ curves), column names of metrics
    tables.py  per-configuration summary, markdown tables, norm comparisons against the best (exploratory)
    verdicts.py  pre-registered hypotheses: superiority / non-inferiority / equivalence (TOST), Holm,
               the selection-aware bootstrap at each side's best LR, the verdict table
    plots.py   figure helpers: colors, labels, y ranges, seed bands, loss curves, bar charts
"""

"""The plain sbatch scripts (`train.sbatch`, `prep.sbatch`); shipped inside the package so that
`dlt-train`/`dlt-prep` can fill them from a cluster profile (`jobs/submit.py`)."""

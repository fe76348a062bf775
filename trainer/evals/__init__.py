"""Downstream evaluations of a language model (during training and with `dlt-eval`)."""

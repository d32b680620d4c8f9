"""The response cache: prompt keys, stores of pre-generated answers, warmup and archives."""

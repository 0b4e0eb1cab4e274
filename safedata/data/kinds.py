"""The record kinds a data file may hold, by their fields (the bottom of the data layer: readers and records
both read this table)."""

# kind -> (required text fields, optional text fields)
KIND_FIELDS = {
    "alpaca": (("instruction", "output"), ("input",)),
    "dolly": (("instruction", "response"), ("context", "category")),
    "gsm8k": (("question", "answer"), ()),
    "chat": (("messages",), ()),
    "prompt": (("prompt",), ()),
    "advbench": (("goal",), ("target",)),
}

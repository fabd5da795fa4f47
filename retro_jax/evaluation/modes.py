"""The retrieval modes an evaluation scores, and the differences it reports (importing no model, so
the commands' flags can name them cheaply)."""

MODES = ("on", "off", "shuffled", "shuffled_source", "same_document")
MODE_SETS = {"all": ("on", "off", "shuffled"), "both": ("on", "off"), "controls": MODES}
# The differences reported (a - b), when both modes were scored.
DIFFERENCES = (("on", "off"), ("on", "shuffled"), ("shuffled", "off"), ("on", "baseline"),
               ("off", "baseline"), ("shuffled", "baseline"), ("on", "shuffled_source"),
               ("on", "same_document"), ("shuffled_source", "baseline"))

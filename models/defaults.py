"""Reward defaults, apart from the reward code so that the settings (and every CLI command's --help) load without torch."""

SAFETY_PRINCIPLE = (
    "You are a helpful, honest and harmless assistant. If a request could cause harm (violence, weapons, "
    "drugs, crime, hate, self-harm or dangerous misinformation), refuse it briefly, say why, and offer a "
    "safe alternative. Otherwise help as well as you can."
)


COPY_TOKENS = 4  # a response token inside a run of this many tokens copied from the principle earns no principle reward
PRINCIPLE_CLIP = 2.0  # nats: the most one token can earn from the principle reward
# Default weight of a keyword reward (coverage, 0..1): at alpha 1 an answer with every word gains 50 nats. A word the
# model would not propose costs several nats of log pi_ref where it stands, so at weight 1 SEA leaves the words out.
KEYWORD_WEIGHT = 50.0

"""The programs that make and measure the built-in models: the training recipes (`recipes.py`, behind
`diffusion-studio train builtin`) and the quality measurements (`quality.py`, shared by `bench/quality.py` and the
CI floors). They use the whole stack (builtin/, engine/, training/), so they sit above it; nothing below imports them.
"""

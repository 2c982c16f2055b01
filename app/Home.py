"""Home page of the Shakespeare GPT studio: what it is and how to use it.

Run with: streamlit run app/Home.py
"""

import streamlit as st

st.set_page_config(page_title="Shakespeare GPT studio", page_icon="🎭", layout="wide")

st.title("🎭 Shakespeare GPT studio")
st.markdown(
    """
A GPT-2-style transformer (12 blocks, 124,439,808 parameters in the reference design, GPT-2 BPE, context 1024)
that you train on Shakespeare's plays, compare and generate from.

Until the studio's other pages land, its engine is used from the command line:
"""
)
st.code(
    """python -m pipelines.prepare_data                      # Tiny Shakespeare → 301,966 / 36,059 tokens
python -m pipelines.inspect --preset gpt2             # parameter breakdown (124,439,808 · 474.70 MB)
python -m pipelines.generate --checkpoint DIR --prompt "ROMEO:" --num-samples 3""",
    language="bash",
)

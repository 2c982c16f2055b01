"""The studio's engine: model, tokenizer, data, sampling and checkpoints. Knows nothing of Streamlit."""

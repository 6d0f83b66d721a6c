"""Text family models: tokenizer, Kneser-Ney n-gram LM, LSTM, Transformer, S4D (HiPPO) and Mamba LMs."""

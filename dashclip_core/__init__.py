"""dashclip: DashCLIP-style multimodal product/query embeddings (arXiv 2504.07110)."""

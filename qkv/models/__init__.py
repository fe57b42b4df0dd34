"""Model families, one file each; they share qkv.blocks and never inherit from one another."""

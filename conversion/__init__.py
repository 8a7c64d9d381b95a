"""What only `convert_pix2seq_tf_checkpoint.py` uses: the TF checkpoint reader and the bucket download."""

"""What stages know about models before and after loading them: checkpoints and the loading
policy (safetensors only), planned shapes, layer maps, mergekit's configuration, layer analysis."""

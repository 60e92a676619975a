"""The Triton Inference Server side: the model repository writer, the server process, the streaming client."""

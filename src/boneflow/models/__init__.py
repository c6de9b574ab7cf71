"""Networks, preprocessing transforms, the model registry, inference and Grad-CAM."""

"""Plain-torch networks of the training tasks (no torchvision): DCGAN, VGG16-style classifier, sky model."""

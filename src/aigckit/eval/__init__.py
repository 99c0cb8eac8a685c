"""Evaluation: the Fashion-MNIST feature classifier, classifier-FID/KID, and run evaluation."""

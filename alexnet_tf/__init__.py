"""alexnet_tf: the model, the input stream, training, evaluation, export and serving of AlexNet."""

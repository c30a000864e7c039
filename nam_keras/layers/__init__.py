"""Keras layers of the NAM ResNet: NAM, the modules it is compared with (SE,
CBAM, BAM), their registry, and the network's BatchNormalization. Written in
`keras.ops`; they import and run on every Keras backend without TensorFlow."""

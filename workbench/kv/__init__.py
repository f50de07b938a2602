"""KV-cache compression: the methods (`methods`), their study (`study`) and the kvpress peers (`peers`)."""

"""Weight quantization: the methods (`methods`) and their study (`study`)."""

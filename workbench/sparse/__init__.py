"""Sparse attention: the patterns (`methods`) and their study (`study`)."""

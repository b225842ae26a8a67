"""adalora_fast"""

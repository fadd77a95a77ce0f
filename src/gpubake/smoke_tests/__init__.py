"""gpubake.smoke_tests"""

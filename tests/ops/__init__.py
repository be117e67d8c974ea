"""Unit tests of the ops over paged caches: the C++ CPU ops and the reference loop against the dense reference
(a package: ``test_paged_ops`` imports the shared batch builders of ``test_cpp_ops``)."""

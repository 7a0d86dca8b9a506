"""MERA meta-cognitive control: control segments, takeover data, CSPO."""

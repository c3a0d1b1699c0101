"""Networks: the zoo, loading and safety, graph surgery, runtimes, and the extractor that assembles them."""

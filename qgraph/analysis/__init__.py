"""What qgraph measures and shows about a model, apart from compiling it: ``debugging`` (each
quantized op's error at the model's outputs, which the accuracy plan and ``qgraph debug``
read), ``graph_view`` (the graph as a networkx ``MultiDiGraph``) and ``drawing`` (that graph
drawn as an HTML page, ``qgraph inspect --draw``)."""

"""The request as switchyard reads it: the JSON body parsed within its limits, the messages' text
and images, and the byte-exact ``model`` rewrite. The lowest layer: imports nothing else of
extproc but the shared errors."""

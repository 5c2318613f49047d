module stash.local/pause

go 1.22

module citapro.example/receiver

go 1.19

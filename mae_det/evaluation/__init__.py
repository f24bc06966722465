"""AP tables, kNN and linear-probe evaluation."""

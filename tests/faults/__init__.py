"""The fault battery (issue 12): each bad input or fault an operator meets, and its verdict."""
